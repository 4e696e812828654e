"""The `score` pipeline, one stage per module, in data-flow order.

discover -> headers -> join -> reconcile (`ingest`, shared with training) -> decode (process pool) ->
batcher -> runner -> writer (parts) (`loop.ScoringLoop`) -> finalize (+ manifest). Output-form ids and
message scrubbing: `privacy`. `pipeline.score_cohort` is the one entry point; the CLI only parses options.
"""

from __future__ import annotations

from xbmd_batch.score.pipeline import ScoreOptions, ScoreResult, score_cohort

__all__ = ["ScoreOptions", "ScoreResult", "score_cohort"]

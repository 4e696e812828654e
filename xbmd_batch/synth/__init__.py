"""SYNTHETIC hip-radiograph cohort generator (`xbmd-batch synth`): covariates, BMD model, renderer, DICOM.

Public API: `SynthConfig`, `generate_cohort`, `CohortSummary`, `CovariateModel`, `draw_covariates`,
`oracle_r2`, `GeneratorV2` (version 2, the default; `SynthConfig(generator_version=1)` is v1).
The forward model's equations are in docs/synth.md and in the covariates / render module docstrings.
"""

from __future__ import annotations

from xbmd_batch.synth.cohort import (
    GENERATOR_VERSION,
    GENERATOR_VERSIONS,
    CohortSummary,
    SynthConfig,
    generate_cohort,
)
from xbmd_batch.synth.covariates import (
    CovariateModel,
    GeneratorV2,
    apply_missing,
    draw_covariates,
    oracle_r2,
    realised_stats,
)

__all__ = [
    "GENERATOR_VERSION",
    "GENERATOR_VERSIONS",
    "CohortSummary",
    "CovariateModel",
    "GeneratorV2",
    "SynthConfig",
    "apply_missing",
    "draw_covariates",
    "generate_cohort",
    "oracle_r2",
    "realised_stats",
]

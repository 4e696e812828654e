"""Cross-validated training of XAttn-BMD and the concat baseline (`python -m train`), run from a checkout.

Modules: presets (named hyper-parameter sets), data (cohort + image cache), folds (CV splits), engine
(train_one_epoch / evaluate / fit), metrics, plots, report; the CLI is `train/__main__.py`
(`get_args_parser()` + `main(args)`; the parser in `args`, the output stage in `outputs`). Imports
`xbmd_batch`; the package never imports this.
"""

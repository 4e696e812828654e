"""xbmd-batch: femoral-neck BMD from hip X-ray DICOMs plus clinical metadata, for whole cohorts."""

__version__ = "0.1.0"

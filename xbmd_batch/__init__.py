"""xbmd-batch: femoral-neck BMD from hip X-ray DICOMs plus clinical metadata, for whole cohorts."""

import os as _os

__version__ = "0.1.0"

# onnxruntime's official builds start a telemetry client at import: it writes a device id and an event
# database under ~/.cache/Microsoft/DeveloperTools/.onnxruntime, outside any folder the user named. This
# switch (read by onnxruntime at initialisation) stops it for this process and its workers; a user who
# wants telemetry sets ORT_DISABLE_TELEMETRY=0 explicitly. See docs/outputs.md (Privacy).
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

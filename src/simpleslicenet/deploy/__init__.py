"""Deployment: safe model loading, volume inference on the CPU, ``predict`` and ``calibrate``.

Models are exported by their own ``to_openvino`` (``anomalib export`` or ``model.to_openvino``:
atomic, tagged with the training preprocessing, see :mod:`simpleslicenet.models.export`); this package
loads such files without running code from them (:mod:`.loading`, :mod:`.openvino`) and runs them on scans.

Example:
    >>> from simpleslicenet.deploy import VolumeInferencer
    >>> inferencer = VolumeInferencer("results/.../weights/openvino/model.xml")  # doctest: +SKIP
    >>> prediction = inferencer.predict("scan.nii.gz")  # doctest: +SKIP
    >>> prediction.volume_score, prediction.anomaly_map.shape  # doctest: +SKIP

or ``simpleslicenet predict --model model.xml --input scans/ --output maps/``; label-free masks with
``simpleslicenet calibrate --model model.xml --input healthy/ --output calibration.json`` and then
``simpleslicenet predict ... --calibration calibration.json --fdr 0.05``.
"""

from simpleslicenet.deploy.calibrate import calibrate_paths
from simpleslicenet.deploy.inferencer import VolumeInferencer, VolumePrediction
from simpleslicenet.deploy.loading import ModelFileError, ModelOutputError
from simpleslicenet.deploy.predict import predict_paths, predict_scan
from simpleslicenet.deploy.report import PredictionReport

__all__ = [
    "calibrate_paths",
    "ModelFileError",
    "ModelOutputError",
    "PredictionReport",
    "VolumeInferencer",
    "VolumePrediction",
    "predict_paths",
    "predict_scan",
]

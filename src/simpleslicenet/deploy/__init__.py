"""Deployment: OpenVINO export (:mod:`.export`, atomic, tagged with the training preprocessing) and volume inference.

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
from simpleslicenet.deploy.inferencer import ModelFileError, ModelOutputError, VolumeInferencer, VolumePrediction
from simpleslicenet.deploy.predict import PredictionReport, predict_paths

__all__ = ["calibrate_paths", "ModelFileError", "ModelOutputError", "PredictionReport", "VolumeInferencer", "VolumePrediction", "predict_paths"]

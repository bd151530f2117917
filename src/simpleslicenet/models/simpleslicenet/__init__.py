"""SimpleSliceNet: efficient slice anomaly detection network for 3-D brain MRI volumes.

A frozen 2-D ImageNet backbone embeds each axial slice; 3×3 neighbourhood means of two backbone
stages are channel-pooled and fused, averaged over neighbouring slices, and a conditional normalizing
flow (FrEIA ``AllInOneBlock`` couplings conditioned on a sinusoidal position code) learns their
density on healthy volumes, contrasted with Gaussian-noised copies of the same features. The
per-location likelihood becomes a voxel anomaly map (trilinear upsampling, 3-D Gaussian smoothing);
slice and volume scores are its maxima.

Example:
    >>> import torch
    >>> from simpleslicenet.models.simpleslicenet import SimpleSliceNet
    >>> model = SimpleSliceNet(flow_blocks=2, smoothing_sigma=1.0).eval()
    >>> slices = torch.rand(12, 3, 32, 32)  # one volume: 12 axial slices in [0, 1]
    >>> with torch.no_grad():
    ...     prediction = model(slices)  # ImageNet normalisation, model, post-processing
    >>> tuple(prediction.anomaly_map.shape), tuple(prediction.pred_score.shape)
    ((12, 32, 32), (12,))

Paper:
    Title: Efficient Slice Anomaly Detection Network for 3D Brain MRI Volume
    Authors: Zhengxuan Zhang, Yalda Mohsenzadeh
    URL: https://arxiv.org/abs/2408.15958

See Also:
    :class:`simpleslicenet.models.simpleslicenet.torch_model.SimpleSliceNetModel`: the exportable
    PyTorch model; :mod:`simpleslicenet.models.simpleslicenet.loss`: the training objectives.
"""

from .lightning_model import SimpleSliceNet
from .torch_model import SimpleSliceNetModel

__all__ = ["SimpleSliceNet", "SimpleSliceNetModel"]

"""3D convolutional autoencoder: the volumetric reconstruction baseline.

A whole volume is encoded by stride-2 3D convolutions to a small spatial bottleneck and decoded by
mirrored transposed convolutions; trained on healthy volumes, it reconstructs healthy anatomy well
and lesions badly, so the smoothed residual ``|x - x̂|`` inside the brain is the anomaly map. This is
the kind of autoencoder compared in Baur et al., "Autoencoders for unsupervised anomaly segmentation
in brain MR images: a comparative study", Medical Image Analysis 69 (2021), extended to 3D.

Example:
    >>> from anomalib.engine import Engine
    >>> from simpleslicenet.models.ae3d import AE3D
    >>> model = AE3D(latent_channels=16, sigma=2.0)
    >>> engine = Engine(max_epochs=50)
    >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
    >>> predictions = engine.predict(model=model, datamodule=datamodule)  # doctest: +SKIP

See Also:
    :class:`simpleslicenet.models.ae3d.torch_model.AutoEncoder3dModel`: the network itself.
"""

from .lightning_model import AE3D
from .torch_model import AutoEncoder3dModel

__all__ = ["AE3D", "AutoEncoder3dModel"]

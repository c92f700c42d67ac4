"""OCI images: import from layouts and archives, verify, unpack layers, keep them in a store.

* :mod:`runtime.image.oci`: image layouts, oci-archive and docker-archive tars, descriptors,
  digests, image configs (OCI image-spec ``image-layout.md``, ``manifest.md``, ``config.md``).
* :mod:`runtime.image.layers`: safe unpacking of one layer tar into overlayfs form
  (``layer.md`` "Whiteouts").
* :mod:`runtime.image.store`: the content-addressed store under the state root.
* :mod:`runtime.image.transfer`: sending an image to another node's store (layer tars re-made
  from the unpacked layers, the image record), for migrations.

Typical use::

    store = ImageStore(Path("/var/lib/jaula"))
    image = store.import_path(Path("busybox.tar"))
    lowerdirs = store.layer_dirs(store.resolve("busybox"))   # bottom -> top
"""

from runtime.image.layers import LayerStats, UnpackLimits, unpack_layer, verify_layer
from runtime.image.oci import ImageConfig, normalize_name
from runtime.image.store import Image, ImageStore
from runtime.image.transfer import export_layer, image_record, import_layer, register_image

__all__ = [
    "Image",
    "ImageConfig",
    "ImageStore",
    "LayerStats",
    "UnpackLimits",
    "export_layer",
    "image_record",
    "import_layer",
    "normalize_name",
    "register_image",
    "unpack_layer",
    "verify_layer",
]

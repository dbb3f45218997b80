"""Download and prepare TFDS datasets as ArrayRecord files, for offline use by ``load_tfds``.

Run on a machine with network access::

    python -m bnn_flat.data.prepare mnist fashion_mnist cifar10 --data_dir /data/tfds

then copy ``/data/tfds`` to the machine that trains and pass ``data_dir="/data/tfds"`` to
:func:`bnn_flat.data.load_tfds` (or set ``TFDS_DATA_DIR``).

This calls ``tfds.builder(name, data_dir=..., file_format="array_record")
.download_and_prepare()``. TFDS encodes images with TensorFlow while preparing; when
TensorFlow is not installed, images are encoded as PNG (or JPEG, when the feature asks for
it) with Pillow instead, which gives byte streams that the standard TFDS decoders read. The
whole preparation pipeline was checked without TensorFlow on a small generated dataset;
downloading the real datasets could not be checked on the offline development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
from collections.abc import Iterator, Sequence

__all__ = ["prepare_dataset", "main"]


def prepare_dataset(name: str, *, data_dir: str | os.PathLike | None = None) -> str:
    """Downloads (if needed) and prepares one TFDS dataset in ArrayRecord format.

    Args:
      name: The TFDS name, e.g. ``"mnist"``, ``"cifar10"``, ``"svhn_cropped"``.
      data_dir: The TFDS data directory to write to; ``None`` uses ``TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.

    Returns:
      The directory holding the prepared version (``DATA_DIR/name/version``).

    Example:
      >>> prepare_dataset("mnist", data_dir="/data/tfds")  # doctest: +SKIP
      '/data/tfds/mnist/3.0.1'
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(
        name,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        file_format="array_record",
    )
    with _pillow_image_encoding_without_tensorflow():
        builder.download_and_prepare()
    return str(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m bnn_flat.data.prepare NAME... --data_dir DIR``.

    Args:
      argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
      The process exit code (0 on success).

    Example:
      >>> main(["mnist", "--data_dir", "/data/tfds"])  # doctest: +SKIP
      0
    """
    parser = argparse.ArgumentParser(
        prog="python -m bnn_flat.data.prepare",
        description="Download and prepare TFDS datasets as ArrayRecord files for load_tfds.",
    )
    parser.add_argument("names", nargs="+", help="TFDS dataset names, e.g. mnist cifar10")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    arguments = parser.parse_args(argv)
    for name in arguments.names:
        path = prepare_dataset(name, data_dir=arguments.data_dir)
        print(f"prepared {name} in {path}")
    return 0


@contextlib.contextmanager
def _pillow_image_encoding_without_tensorflow() -> Iterator[None]:
    """Encodes TFDS images with Pillow while preparing, if TensorFlow is unavailable.

    TFDS's image encoder (``_ImageEncoder._encode_image``, a private API) runs
    ``tf.image.encode_png``/``encode_jpeg``. Without TensorFlow it is replaced, for the
    duration of the context, by a Pillow encoder of the same format. With TensorFlow, or if
    the private API moved, nothing is changed.
    """
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    from tensorflow_datasets.core.features import image_feature

    encoder_class = getattr(image_feature, "_ImageEncoder", None)
    if encoder_class is None or not hasattr(encoder_class, "_encode_image"):
        yield
        return
    original = encoder_class._encode_image
    encoder_class._encode_image = _encode_with_pillow
    try:
        yield
    finally:
        encoder_class._encode_image = original


def _encode_with_pillow(self, np_image) -> bytes:
    """Pillow replacement of ``_ImageEncoder._encode_image`` (PNG or JPEG bytes)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(np_image)
    if array.dtype not in (np.uint8, np.uint16) or array.ndim != 3:
        raise ValueError(
            "expected an image of shape (H, W, C) and dtype uint8 or uint16, got shape "
            f"{array.shape} and dtype {array.dtype}."
        )
    if array.shape[-1] == 1:
        array = array[..., 0]
    image_format = "JPEG" if getattr(self, "encoding_format", "png") == "jpeg" else "PNG"
    buffer = io.BytesIO()
    options = {"quality": 95} if image_format == "JPEG" else {}
    Image.fromarray(array).save(buffer, format=image_format, **options)
    return buffer.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())

"""Read one radiograph (DICOM, PNG or JPEG) into float32 pixels in [0, 1] with air dark, or say why not.

DICOM pipeline, in the order of PS3.3 C.11 (grayscale standard display pipeline):

    stored values -> keep Bits Stored (mask or sign-extend the unused high bits)
    -> modality: Modality LUT Sequence, else Rescale Slope / Intercept
    -> VOI: the first VOI LUT, else the first Window Center / Width (LINEAR, LINEAR_EXACT or SIGMOID),
       else a min-max stretch of the modality values
    -> MONOCHROME1 inverted, once.

The inversion rule: Photometric Interpretation alone decides. MONOCHROME1 is inverted; Presentation LUT
Shape is not applied on top of it, because the DX/MG/IO image modules require INVERSE with MONOCHROME1
(and IDENTITY with MONOCHROME2): it restates the same inversion. A MONOCHROME2 file is left as stored
whatever its Presentation LUT Shape says. Pixel Intensity Relationship Sign is not used either: vendors
fill it inconsistently (the Canon MONOCHROME1 test chest says -1 with air stored high).

A VOI LUT or window that maps every value in the image to one output (a header that disagrees with its
pixel data, as in pylibjpeg-data's 16-bit J2K chest whose window lies far below all its values) is
ignored with a warning, and the min-max stretch used instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from client.data.errors import Rejected
from client.data.files import open_regular

log = logging.getLogger(__name__)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

# Values longer than this stay on disk while the header is checked, so native pixel data of a refused
# image is never read (encapsulated pixel data is read to find its end, but never decoded).
_DEFER_BYTES = 64 * 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Without a file meta header the dataset starts straight away; ACR-NEMA files open with group 0000 or 0008.
_HEADERLESS_FIRST_GROUPS = (0x0000, 0x0008)
_SYNTAX_OF_ENCODING = {  # (implicit VR, little endian) as pydicom detected them -> transfer syntax
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
# Pillow modes read as they are, with the value that maps to 1.0; any other mode is converted to "L".
_PILLOW_FULL_SCALE = {"L": 255.0, "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I": 65535.0}


@dataclass
class ImageHeader:
    """What an image file says about itself, read without decoding its pixels."""

    rows: int
    columns: int
    view_position: str | None
    pixel_spacing: tuple[float, float] | None
    photometric: str
    source: str
    bits_stored: int


@dataclass
class LoadedImage:
    """A decoded image and the metadata training needs."""

    pixels: np.ndarray                          # float32 [H, W] in [0, 1], air dark (MONOCHROME2 sense)
    view_position: str | None                   # upper-case DICOM ViewPosition or None
    pixel_spacing: tuple[float, float] | None   # mm (row, col)
    photometric: str                            # as stored; 'GRAY' for PNG/JPEG
    source: str                                 # 'dicom' | 'png' | 'jpeg'
    bits_stored: int

    @classmethod
    def from_header(cls, pixels: np.ndarray, header: ImageHeader) -> LoadedImage:
        return cls(pixels, header.view_position, header.pixel_spacing, header.photometric, header.source,
                   header.bits_stored)


def read_image(path, max_pixels: int = 40_000_000) -> LoadedImage:
    """Decode `path` to float32 [0, 1], air dark; raises Rejected with a reason code naming the file."""
    with OpenImage(path) as image:
        return _READ_IMAGE[_sniff(image)](image, max_pixels)


def read_header(path, max_pixels: int = 40_000_000) -> ImageHeader:
    """The header checks of read_image (format, size, frames, photometric) without touching pixel data."""
    with OpenImage(path) as image:
        return _READ_HEADER[_sniff(image)](image, max_pixels)


class OpenImage:
    """An image file opened once, as a regular file, that pydicom and Pillow read through.

    Opened by name again (pydicom does so for deferred values), the name could meanwhile point at a
    pipe that blocks or a device that never ends; this handle stays on the file that was checked.
    It prints as its path, so messages name the file.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.name = str(self.path)
        # A regular file only: a pipe or device given here (or swapped in since the index checked) would
        # block or never end inside pydicom or Pillow.
        self._handle = open_regular(self.path)

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def size(self) -> int:
        return os.fstat(self._handle.fileno()).st_size

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "OpenImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return self.name


def _sniff(path: OpenImage) -> str:
    head = path.read(132)
    path.seek(0)
    if not head:
        raise Rejected("empty_file", f"{path}: the file has zero bytes")
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SIGNATURE) and head[128:132] != b"DICM":
        return "jpeg"
    return "dicom"  # with a preamble, or possibly headerless: _open_dicom decides


# ---------------------------------------------------------------------------------------------- DICOM


def _open_dicom(path: OpenImage, stop_before_pixels: bool) -> Dataset:
    try:
        path.seek(0)
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES, stop_before_pixels=stop_before_pixels)
    except Exception as error:  # pydicom raises many types on garbage; all mean "not a dataset"
        raise Rejected("not_dicom", f"{path}: cannot be parsed as DICOM ({error})") from None
    has_preamble = ds.preamble is not None
    if len(ds) == 0:
        # pydicom drops the whole dataset when the file ends inside an undefined-length element
        # (encapsulated pixel data, a sequence) and returns an empty one with a warning.
        if has_preamble:
            raise Rejected("truncated_file", f"{path}: the file ends before its dataset is complete")
        raise Rejected("not_dicom", f"{path}: neither a DICOM file nor a PNG or JPEG")
    if not (has_preamble or "TransferSyntaxUID" in ds.file_meta or _looks_headerless(ds)):
        raise Rejected("not_dicom", f"{path}: neither a DICOM file nor a PNG or JPEG")
    _check_complete(ds, path, stop_before_pixels)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _SYNTAX_OF_ENCODING.get(ds.original_encoding, ImplicitVRLittleEndian)
    return ds


def _looks_headerless(ds: Dataset) -> bool:
    first_group = next(iter(ds.keys())) >> 16
    return first_group in _HEADERLESS_FIRST_GROUPS or ("Rows" in ds and "Columns" in ds)


def _check_complete(ds: Dataset, path: OpenImage, stopped_before_pixels: bool) -> None:
    """Raise truncated_file when the file ends inside an element.

    pydicom stops silently there: a short value is kept short, a deferred one is skipped past the end,
    and fewer than 8 bytes left for the next element's header are ignored. So the last element read
    must end exactly at the end of the file, or (header only) where the pixel data element starts.
    """
    elements = (ds.get_item(tag, keep_deferred=True) for tag in ds.keys())
    last = max(elements, key=lambda element: getattr(element, "value_tell", None) or getattr(element, "file_tell", 0))
    if getattr(last, "value_tell", None) is None or last.length == _UNDEFINED_LENGTH:
        return  # a sequence or encapsulated data: pydicom found its delimiter, so it is complete
    end, size = last.value_tell + last.length, path.size()
    if end == size or (stopped_before_pixels and end < size and _group_at(path, end, ds) == 0x7FE0):
        return
    if end > size:
        detail = f"the file ends at byte {size}, inside the element {last.tag} that should end at byte {end}"
    else:
        detail = f"the {size - end} bytes after the element {last.tag} do not form a complete element"
    raise Rejected("truncated_file", f"{path}: {detail}")


def _group_at(path: OpenImage, offset: int, ds: Dataset) -> int:
    path.seek(offset)
    group = path.read(2)
    return int.from_bytes(group, "little" if ds.original_encoding[1] is not False else "big")


def _dicom_header(ds: Dataset, path: Path, max_pixels: int) -> ImageHeader:
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not rows or not columns:
        raise Rejected("not_an_image", f"{path}: no Rows/Columns (SOP class {ds.get('SOPClassUID', 'unknown')})")
    frames = int(ds.get("NumberOfFrames") or 1)
    if rows * columns * frames > max_pixels:
        raise Rejected("too_large", f"{path}: {rows}x{columns}x{frames} pixels is over the limit of {max_pixels}")
    if frames > 1:
        raise Rejected("unsupported_multiframe", f"{path}: {frames} frames; only single-frame images are used")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric not in MONOCHROME or samples != 1:
        raise Rejected("unsupported_photometric",
                       f"{path}: photometric interpretation {photometric or 'missing'!r} with {samples} samples")
    view = str(ds.get("ViewPosition") or "").strip().upper() or None
    return ImageHeader(rows, columns, view, _pixel_spacing(ds), photometric, "dicom",
                       int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16))


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):  # absent, one value, or not numbers
        return None
    return (row, col) if row > 0 and col > 0 else None


def _dicom_header_only(path: OpenImage, max_pixels: int) -> ImageHeader:
    return _dicom_header(_open_dicom(path, stop_before_pixels=True), path, max_pixels)


def _read_dicom(path: OpenImage, max_pixels: int) -> LoadedImage:
    ds = _open_dicom(path, stop_before_pixels=False)
    header = _dicom_header(ds, path, max_pixels)
    if "PixelData" not in ds:
        raise Rejected("not_an_image", f"{path}: no (7FE0,0010) Pixel Data element")
    try:
        stored = ds.pixel_array
    except Exception as error:  # codec errors come as RuntimeError, ValueError, NotImplementedError...
        syntax = ds.file_meta.TransferSyntaxUID
        raise Rejected("undecodable_pixels", f"{path}: {syntax.name}: {error}") from None
    if stored.shape != (header.rows, header.columns):
        raise Rejected("undecodable_pixels", f"{path}: decoded shape {stored.shape} is not "
                                             f"{header.rows}x{header.columns}")
    values, low, high = _modality(_keep_bits_stored(stored, header.bits_stored), ds)
    if low == high:
        raise Rejected("blank_image", f"{path}: every pixel has the value {low}")
    pixels = _voi(values, ds, low, high, path)
    if header.photometric == "MONOCHROME1":
        np.subtract(1.0, pixels, out=pixels)
    return LoadedImage.from_header(pixels, header)


def _keep_bits_stored(stored: np.ndarray, bits_stored: int) -> np.ndarray:
    """Clear (unsigned) or sign-extend (signed) the bits above Bits Stored: their content is undefined."""
    spare = stored.dtype.itemsize * 8 - bits_stored
    if spare <= 0:
        return stored
    if not stored.flags.writeable:
        stored = stored.copy()
    if stored.dtype.kind == "u":
        np.bitwise_and(stored, (1 << bits_stored) - 1, out=stored)
    else:  # arithmetic right shift copies the sign bit back down
        np.left_shift(stored, spare, out=stored)
        np.right_shift(stored, spare, out=stored)
    return stored


def _modality(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """Stored values -> float32 modality values (Modality LUT, else rescale) and their lowest and highest."""
    lut = _lut(ds.get("ModalityLUTSequence"), ds)
    if lut is not None:
        table, first = lut
        values = _lookup(table.astype(np.float32), stored, first)
        return values, float(values.min()), float(values.max())
    slope, intercept = _number(ds.get("RescaleSlope"), 1.0), _number(ds.get("RescaleIntercept"), 0.0)
    # The range comes from the integer extremes (4x cheaper than float32 min/max); the same float32
    # operations on both arrays keep it exact.
    ends = np.array([stored.min(), stored.max()], dtype=np.float32)
    values = stored.astype(np.float32)
    for array in (values, ends):
        if slope != 1.0:
            array *= slope
        if intercept != 0.0:
            array += intercept
    return values, float(ends.min()), float(ends.max())


def _voi(values: np.ndarray, ds: Dataset, low: float, high: float, path: Path) -> np.ndarray:
    """Modality values -> [0, 1]: the first usable VOI transform, else a min-max stretch."""
    for transform in (_voi_lut, _window):
        pixels = transform(values, ds, low, high, path)
        if pixels is not None:
            return pixels
    values -= low
    values /= high - low  # a division keeps the maximum at exactly 1.0
    return values


def _voi_lut(values, ds, low, high, path) -> np.ndarray | None:
    lut = _lut(ds.get("VOILUTSequence"), ds)
    if lut is None:
        return None
    table, first = lut
    start, stop = np.clip(np.array([low, high]).astype(np.int64) - first, 0, len(table) - 1)
    used = table[start:stop + 1]
    if used.min() == used.max():
        log.warning("%s: VOI LUT maps every pixel to one value; ignoring it", path)
        return None
    # Scaled by the table's own range: the bit depth in LUT Descriptor is often wrong in practice.
    bottom, top = float(table.min()), float(table.max())
    scaled = (table.astype(np.float32) - bottom) / np.float32(top - bottom)
    return _lookup(scaled, values, first)


def _window(values, ds, low, high, path) -> np.ndarray | None:
    center, width = _number(_first(ds.get("WindowCenter")), None), _number(_first(ds.get("WindowWidth")), None)
    if center is None or width is None or width <= 0:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        log.warning("%s: unknown VOI LUT Function %r; using LINEAR", path, function)
        function = "LINEAR"
    apply = WINDOW_FUNCTIONS[function]
    ends = apply(np.array([low, high], dtype=np.float32), center, width)
    if ends[0] == ends[1]:
        log.warning("%s: window %g/%g maps all values (%g..%g) to one; ignoring it", path, center, width, low, high)
        return None
    return apply(values, center, width)


def _linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1: 0 at or below c - 0.5 - (w-1)/2, 1 above c - 0.5 + (w-1)/2, linear between."""
    span = max(width - 1.0, 1e-6)  # a width of 1 is a step
    values -= center - 0.5 - span / 2
    values /= span
    return np.clip(values, 0.0, 1.0, out=values)


def _linear_exact(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2: (x - c) / w + 0.5, clipped."""
    values -= center
    values /= width
    values += 0.5
    return np.clip(values, 0.0, 1.0, out=values)


def _sigmoid(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1: 1 / (1 + exp(-4 (x - c) / w))."""
    values -= center
    values *= -4.0 / width
    with np.errstate(over="ignore"):  # exp overflows to inf far below the centre, which gives exactly 0
        np.exp(values, out=values)
    values += 1.0
    return np.reciprocal(values, out=values)


WINDOW_FUNCTIONS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "LINEAR": _linear,
    "LINEAR_EXACT": _linear_exact,
    "SIGMOID": _sigmoid,
}


def _lut(sequence, ds: Dataset) -> tuple[np.ndarray, int] | None:
    """(table, first mapped value) of a LUT sequence's first item, or None when absent or incomplete."""
    if not sequence:
        return None
    item = sequence[0]
    descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
    if descriptor is None or data is None or len(descriptor) != 3:
        return None
    first = int(descriptor[1])
    if int(ds.get("PixelRepresentation") or 0) == 1 and first >= 1 << 15:
        first -= 1 << 16  # read as US; signed data means a signed first value
    if isinstance(data, bytes):  # VR OW: raw 16-bit words
        order = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
        table = np.frombuffer(data, dtype=f"{order}u2")
    else:
        table = np.atleast_1d(np.asarray(data))
    return (table, first) if table.size else None


def _lookup(table: np.ndarray, values: np.ndarray, first: int) -> np.ndarray:
    """LUT semantics: values below `first` take the first entry, values past the end the last."""
    index = values.astype(np.int32)
    index -= first
    np.clip(index, 0, len(table) - 1, out=index)
    return table[index]


def _first(value):
    """The first of a multi-valued element (Window Center/Width may hold several presets)."""
    if value is None or isinstance(value, (str, bytes, int, float)):
        return value
    return value[0] if len(value) else None


def _number(value, default):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if np.isfinite(number) else default


# ------------------------------------------------------------------------------------------ PNG / JPEG


def _open_pillow(path: OpenImage) -> Image.Image:
    try:
        path.seek(0)
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise Rejected("too_large", f"{path}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise _pillow_rejection(path, error) from None


def _pillow_rejection(path: Path, error: Exception) -> Rejected:
    code = "truncated_file" if "truncated" in str(error).lower() else "undecodable_pixels"
    return Rejected(code, f"{path}: {error}")


def _pillow_header(image: Image.Image, path: Path, max_pixels: int, source: str) -> ImageHeader:
    columns, rows = image.size
    if rows * columns > max_pixels:
        raise Rejected("too_large", f"{path}: {rows}x{columns} pixels is over the limit of {max_pixels}")
    bits = 16 if image.mode.startswith("I") else 8
    return ImageHeader(rows, columns, None, None, "GRAY", source, bits)


def _pillow_header_only(path: OpenImage, max_pixels: int, source: str) -> ImageHeader:
    with _open_pillow(path) as image:
        return _pillow_header(image, path, max_pixels, source)


def _read_pillow(path: OpenImage, max_pixels: int, source: str) -> LoadedImage:
    with _open_pillow(path) as image:
        header = _pillow_header(image, path, max_pixels, source)
        try:
            gray = image if image.mode in _PILLOW_FULL_SCALE else image.convert("L")
            stored = np.asarray(gray)
        except (OSError, SyntaxError, ValueError) as error:
            raise _pillow_rejection(path, error) from None
    pixels = stored.astype(np.float32)
    pixels /= _PILLOW_FULL_SCALE[gray.mode]
    if pixels.min() == pixels.max():
        raise Rejected("blank_image", f"{path}: every pixel has the value {stored.flat[0]}")
    return LoadedImage.from_header(pixels, header)


_READ_IMAGE = {"dicom": _read_dicom, "png": partial(_read_pillow, source="png"),
               "jpeg": partial(_read_pillow, source="jpeg")}
_READ_HEADER = {"dicom": _dicom_header_only, "png": partial(_pillow_header_only, source="png"),
                "jpeg": partial(_pillow_header_only, source="jpeg")}

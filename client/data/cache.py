"""The preprocessing cache: crop to content, resize, uint8, appended to memory-mapped shard files."""
from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

SHARD_BYTES = 256 * 1024 * 1024
log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """The cache folder cannot be written (a read-only or wrong path)."""


@dataclass(frozen=True)
class CacheEntry:
    shard: int
    offset: int
    height: int
    width: int


def crop_to_content(pixels: np.ndarray, flat: float = 0.03, dark: float = 0.03,
                    min_keep: float = 0.25) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the image without its uniform or dark border rows and columns.

    A border line is nearly constant (std < `flat`: padding, collimator shutters) or nearly black
    (mean < `dark`: air outside the body). An axis is left uncropped when less than `min_keep` of
    it would remain, so an odd image is never cut to a sliver.
    """
    def span(mean: np.ndarray, std: np.ndarray) -> tuple[int, int]:
        content = np.flatnonzero((std >= flat) & (mean >= dark))
        if content.size == 0 or content[-1] + 1 - content[0] < min_keep * mean.size:
            return 0, mean.size
        return int(content[0]), int(content[-1]) + 1

    pixels = np.asarray(pixels, dtype=np.float32)
    # Alternate axes: a white column border makes every row look non-uniform until it is gone.
    x0, y0, x1, y1 = 0, 0, pixels.shape[1], pixels.shape[0]
    for _ in range(3):
        region = pixels[y0:y1, x0:x1]
        dx0, dx1 = span(region.mean(axis=0), region.std(axis=0))
        region = region[:, dx0:dx1]
        dy0, dy1 = span(region.mean(axis=1), region.std(axis=1))
        if (dx0, dx1, dy0, dy1) == (0, x1 - x0, 0, y1 - y0):
            break
        x0, x1, y0, y1 = x0 + dx0, x0 + dx1, y0 + dy0, y0 + dy1
    return x0, y0, x1, y1


def resize_short_side(pixels: np.ndarray, short_side: int) -> np.ndarray:
    """The float image resized (antialiased) so its shorter side is `short_side` pixels."""
    height, width = pixels.shape
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return pixels.astype(np.float32, copy=False)
    resized = PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.float32)).resize(
        size, PILImage.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def to_cache_image(pixels: np.ndarray, short_side: int | None = 256) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """What the cache stores for a decoded image in [0, 1]: uint8 pixels and the crop box used."""
    x0, y0, x1, y1 = crop_to_content(pixels)
    cropped = pixels[y0:y1, x0:x1]
    if short_side:
        cropped = resize_short_side(cropped, short_side)
    return np.round(np.clip(cropped, 0.0, 1.0) * 255.0).astype(np.uint8), (x0, y0, x1, y1)


class ImageCache:
    """uint8 images appended to `shard_NNNNN.u8` files; read back by (shard, offset, h, w) with np.memmap.

    Appends take an exclusive lock on the folder (a second writer waits), so two indexers never
    interleave in one shard.
    Readers need no lock: bytes already referenced by the catalog are never rewritten.
    """

    def __init__(self, directory: str | os.PathLike, shard_bytes: int = SHARD_BYTES):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self._writer = None
        self._lock = None
        self._maps: dict[int, np.memmap] = {}

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard_{shard:05d}.u8"

    def shard_sizes(self) -> dict[int, int]:
        """Bytes in each shard on disk (to spot catalog entries whose cache was deleted)."""
        return {int(p.stem.split("_")[1]): p.stat().st_size for p in self.directory.glob("shard_*.u8")}

    # --- writing ----------------------------------------------------------------------------

    def open_for_writing(self) -> None:
        """Take the writer lock now (appends would otherwise take it on first use)."""
        if self._writer is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.directory / ".lock", "w")
        except OSError as error:
            raise CacheError(f"{self.directory}: cannot write the image cache here ({error.strerror or error}); "
                             "choose a writable folder (--cache DIR)") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Several processes may prepare the same data (simulation workers): the later ones wait,
            # then find the files already indexed.
            log.info("waiting for another process that is writing the image cache %s", self.directory)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        shards = sorted(int(p.stem.split("_")[1]) for p in self.directory.glob("shard_*.u8"))
        self._shard = shards[-1] if shards else 0
        self._writer = open(self.shard_path(self._shard), "ab")

    def append(self, image: np.ndarray) -> CacheEntry:
        """Store a 2-D uint8 image; returns where it is."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"the cache stores 2-D uint8 images, got {image.dtype} {image.shape}")
        if self._writer is None:
            self.open_for_writing()
        offset = self._writer.seek(0, os.SEEK_END)
        if offset and offset + image.nbytes > self.shard_bytes:
            self._writer.close()
            self._shard += 1
            self._writer = open(self.shard_path(self._shard), "ab")
            offset = self._writer.seek(0, os.SEEK_END)
        self._writer.write(np.ascontiguousarray(image).tobytes())
        return CacheEntry(self._shard, offset, *image.shape)

    def flush(self) -> None:
        """Make every appended byte visible to readers (call before committing the catalog rows)."""
        if self._writer is not None:
            self._writer.flush()

    # --- reading ----------------------------------------------------------------------------

    def read(self, shard: int, offset: int, height: int, width: int) -> np.ndarray:
        """The stored image as a read-only uint8 [height, width] view of the shard (no decode, no copy)."""
        end = offset + height * width
        mapped = self._maps.get(shard)
        if mapped is None or mapped.size < end:
            mapped = self._maps[shard] = np.memmap(self.shard_path(shard), dtype=np.uint8, mode="r")
        if mapped.size < end:
            raise ValueError(f"{self.shard_path(shard)}: entry at {offset} (+{height}x{width}) is past the "
                             "end of the shard; the cache and catalog disagree — re-index")
        return mapped[offset:end].reshape(height, width)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._maps.clear()

    def __enter__(self) -> "ImageCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        # Dataloader workers get a fresh, read-only handle and map the shards themselves.
        return {"directory": self.directory, "shard_bytes": self.shard_bytes}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["shard_bytes"])

"""Decoding images for the forward pass: uint8 batches, normalised once, decoded ahead.

Two pixel-exact changes to how :func:`embbench.embed.embed_split` feeds a model (the vectors are
those of the model's own transform applied image by image; ``tests/test_embed.py`` checks it):

* **uint8 collation** (:func:`split_transform`). A transform that ends in ``ToTensor`` (or
  timm's ``MaybeToTensor``) and ``Normalize`` -- timm's and open_clip's evaluation transforms
  do -- is split there: each image goes through the PIL steps (resize, crop) only and is kept as
  ``H x W x 3`` uint8; a batch is then converted once, ``x.float() / 255``, ``- mean``,
  ``/ std``: the same element-wise float operations in the same order, so the same bits. It
  saves the per-image float conversion (1.3 of 4.2 ms per 384 px JPEG for EfficientNet-Lite0,
  measured on the project's 2-core machine), moves 4x fewer bytes between DataLoader workers
  and the model, and the ``N x H x W x C`` stack is already channels-last. Other transforms run
  whole, image by image, as before.
* **Decoding ahead** (:class:`DecodeAhead`, used when no DataLoader worker decodes). A
  background thread of the same process decodes the next batches while the model runs the
  current one (Pillow releases the GIL while it decodes and resizes). On Linux the thread runs
  at the lowest priority (``nice`` :data:`DECODE_NICE`), so it takes the cores only where the
  forward pass leaves them idle (between its parallel regions, its single-threaded parts)
  rather than slowing the intra-op threads. When a batch is not ready, the model's thread
  decodes its missing images itself at normal priority: a starved background thread (a busy
  machine) costs nothing against decoding inline, which is the worst case.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from embbench.images import BadImageError, load_rgb

logger = logging.getLogger(__name__)

__all__ = ["DECODE_NICE", "DecodeAhead", "Preprocess", "decode_row", "split_transform"]

# Niceness of the background decoding thread (Linux; 19 = the lowest priority): it runs where
# the forward pass leaves a core idle. Measured in benchmarks/bench_embedding.py (README).
DECODE_NICE = 19
_TO_TENSOR = {"ToTensor", "MaybeToTensor"}


@dataclass(frozen=True)
class Preprocess:
    """A model transform split into per-image PIL steps and a per-batch tensor step.

    Attributes:
        transform: The whole transform (``PIL.Image -> C x H x W`` float tensor).
        pil_steps: The steps before ``ToTensor``; ``None`` when the transform cannot be split.
        mean: ``Normalize``'s mean as a ``1 x C x 1 x 1`` float32 tensor (``None``: not split).
        std: ``Normalize``'s std, same shape.
    """

    transform: Callable[[Image.Image], torch.Tensor]
    pil_steps: tuple[Callable, ...] | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def image(self, img: Image.Image) -> torch.Tensor:
        """One decoded image -> ``H x W x 3`` uint8 when split, else the transform's tensor."""
        if self.pil_steps is None:
            return self.transform(img)
        for step in self.pil_steps:
            img = step(img)
        if isinstance(img, Image.Image) and img.mode == "RGB":
            return torch.from_numpy(np.array(img, dtype=np.uint8))
        # A custom step returned something else: finish it with the transform's own tail.
        return self._finish_one(img)

    def _finish_one(self, img: Any) -> torch.Tensor:
        from torchvision.transforms import functional as tvf

        x = img if isinstance(img, torch.Tensor) else tvf.to_tensor(img)
        return x.sub(self.mean[0]).div_(self.std[0])

    def batch(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack the items of :meth:`image` into the ``N x C x H x W`` float batch."""
        uint8 = self.pil_steps is not None and all(t.dtype == torch.uint8 for t in items)
        if uint8 and len({tuple(t.shape) for t in items}) == 1:
            x = torch.stack(list(items)).permute(0, 3, 1, 2).float().div_(255)
            return x.sub_(self.mean).div_(self.std)
        return torch.stack([self._as_float(t) for t in items])

    def _as_float(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.uint8 or self.pil_steps is None:
            return t
        x = t.permute(2, 0, 1).float().div_(255)
        return x.sub_(self.mean[0]).div_(self.std[0]).contiguous()


def split_transform(transform: Callable) -> Preprocess:
    """Split ``transform`` before its ``ToTensor`` + ``Normalize`` tail, when it has one.

    Args:
        transform: A model's evaluation transform (``torchvision.transforms.Compose``).

    Returns:
        A :class:`Preprocess`; one that runs the whole transform per image when the transform
        is not a ``Compose`` ending in ``ToTensor``/``MaybeToTensor`` and ``Normalize``.
    """
    steps = list(getattr(transform, "transforms", None) or [])
    if (
        len(steps) < 2
        or type(steps[-2]).__name__ not in _TO_TENSOR
        or type(steps[-1]).__name__ != "Normalize"
    ):
        return Preprocess(transform)
    norm = steps[-1]
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.as_tensor(norm.std, dtype=torch.float32).reshape(1, -1, 1, 1)
    if mean.shape[1] not in (1, 3) or std.shape[1] not in (1, 3):
        return Preprocess(transform)
    return Preprocess(transform, tuple(steps[:-2]), mean, std)


def decode_row(path: str, prep: Preprocess) -> tuple[torch.Tensor | None, str | None]:
    """Decode and preprocess one image; ``(tensor, None)`` or ``(None, reason)``, never raises."""
    try:
        return prep.image(load_rgb(path)), None
    except BadImageError as exc:
        return None, exc.reason
    except Exception as exc:  # a transform failing on an odd image must not stop the run
        return None, f"{type(exc).__name__}: {exc}"


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's priority (Linux: niceness is per thread); else do nothing."""
    if not sys.platform.startswith("linux") or nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as err:  # not permitted in some sandboxes: decode at normal priority
        logger.debug("decode thread: cannot set nice %d (%s)", nice, err)


class DecodeAhead:
    """Batches of decoded rows, decoded by a background thread while the model runs.

    Iterating yields ``(indices, batch, bad)`` per batch of ``batches``, in order: the row
    indices that decoded, their ``N x C x H x W`` batch from :meth:`Preprocess.batch` (``None``
    when none decoded) and ``(index, reason)`` for each that did not.

    Args:
        paths: Image file of each row index.
        prep: The split transform.
        batches: Row indices of each batch, in the order the model takes them.
        ahead: Batches the background thread may decode beyond the one the model waits for.
        nice: The background thread's niceness (:data:`DECODE_NICE`; 0 keeps it).
    """

    def __init__(
        self,
        paths: Sequence[str],
        prep: Preprocess,
        batches: Sequence[Sequence[int]],
        *,
        ahead: int = 2,
        nice: int = DECODE_NICE,
    ) -> None:
        self.paths, self.prep, self.batches = paths, prep, [list(b) for b in batches]
        self.ahead, self.nice = max(1, ahead), nice
        self._cond = threading.Condition()
        self._done: dict[int, tuple[torch.Tensor | None, str | None]] = {}
        self._claimed: set[int] = set()
        self._current = 0  # the batch the model waits for
        self._stop = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def _claim(self, i: int) -> bool:
        """Claim row ``i`` for decoding (caller holds the lock); False if someone has it."""
        if i in self._claimed:
            return False
        self._claimed.add(i)
        return True

    def _background(self) -> None:
        _lower_priority(self.nice)
        try:
            for k, rows in enumerate(self.batches):
                for i in rows:
                    with self._cond:
                        while not self._stop and k > self._current + self.ahead:
                            self._cond.wait()
                        if self._stop:
                            return
                        if not self._claim(i):
                            continue
                    result = decode_row(self.paths[i], self.prep)
                    with self._cond:
                        self._done[i] = result
                        self._cond.notify_all()
        except BaseException as exc:  # surfaced in the model's thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _take(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        with self._cond:
            mine = self._claim(i)
            while not mine and i not in self._done:
                if self._error is not None:
                    raise RuntimeError("background decoding failed") from self._error
                self._cond.wait()
            if not mine:
                return self._done.pop(i)
        return decode_row(self.paths[i], self.prep)  # not started: decode it here

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
        worker = threading.Thread(target=self._background, name="embbench-decode", daemon=True)
        worker.start()
        try:
            for k, rows in enumerate(self.batches):
                with self._cond:
                    self._current = k
                    self._cond.notify_all()
                got = [(i, *self._take(i)) for i in rows]
                ok = [(i, t) for i, t, r in got if r is None]
                bad = [(i, r) for i, _, r in got if r is not None]
                batch = self.prep.batch([t for _, t in ok]) if ok else None
                yield [i for i, _ in ok], batch, bad
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            worker.join()

"""Figures and videos to a run's loggers: TensorBoard and Weights & Biases.

The scalars go through Lightning's ``log_dict`` to every logger. Figures (the prompt-sensitivity matrix)
and rollout videos (animated GIFs) are logger-specific, so each logger of the trainer gets a
:class:`MediaSink`: :func:`sinks` builds one per TensorBoard and per W&B logger, and ignores the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tensorboard.compat.proto.summary_pb2 import Summary


class MediaSink(Protocol):
    """Where a figure or a GIF goes, at a step."""

    def figure(self, tag: str, fig: Any, step: int) -> None:
        """A matplotlib figure."""

    def gif(self, tag: str, gif: bytes, path: Path, height: int, width: int, step: int) -> None:
        """An animated GIF, as bytes and as the file ``path`` already written."""


def gif_summary(tag: str, gif: bytes, height: int, width: int) -> Summary:
    """A TensorBoard image summary holding an animated GIF (what ``SummaryWriter.add_video`` writes,
    without its moviepy dependency); TensorBoard's Images tab plays it."""
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class TensorBoardSink:
    """A TensorBoard ``SummaryWriter``: figures as images, GIFs as animated images."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self.writer.add_figure(tag, fig, step, close=False)

    def gif(self, tag: str, gif: bytes, path: Path, height: int, width: int, step: int) -> None:
        self.writer.file_writer.add_summary(gif_summary(tag, gif, height, width), step)
        self.writer.flush()


class WandbSink:
    """A Lightning ``WandbLogger``: figures as ``wandb.Image``, GIFs as ``wandb.Video``, each logged with
    the step as ``trainer/global_step`` (W&B's own step stays monotonic)."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self.logger.log_image(key=tag, images=[fig], step=step)

    def gif(self, tag: str, gif: bytes, path: Path, height: int, width: int, step: int) -> None:
        self.logger.log_video(key=tag, videos=[str(path)], step=step, format=["gif"])


def sinks(trainer: Any) -> list[MediaSink]:
    """A :class:`MediaSink` per TensorBoard or W&B logger of a Lightning ``trainer``."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    found: list[MediaSink] = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            found.append(TensorBoardSink(logger.experiment))
        elif isinstance(logger, WandbLogger):
            found.append(WandbSink(logger))
    return found


__all__ = ["MediaSink", "TensorBoardSink", "WandbSink", "gif_summary", "sinks"]

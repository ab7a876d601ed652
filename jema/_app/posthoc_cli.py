"""``jema posthoc DIR``: list the snapshots of a folder, or rebuild one EMA width from them and
write it as a SuperGradients checkpoint (``.pth``) or a ``.safetensors`` file.

The written file's ``ema_net`` is the reconstruction (params and, when the snapshots hold them,
the averaged BatchNorm statistics); ``net`` is the same reconstruction, since snapshots keep no
raw weights and a loader that picks ``net`` should get the chosen EMA, not another one. The
entries ``posthoc_sigma_rel`` and ``posthoc_step`` say which width and step it is.
"""

from __future__ import annotations

import os
from typing import Any

from jema import posthoc


def snapshot_table(directory: str) -> str:
    """The snapshots of ``directory`` as a text table, one line per step, and a count.

    Args:
      directory: a snapshot folder.

    Returns:
      The table.

    Raises:
      FileNotFoundError: when the folder does not exist.
      ValueError: when a step there is not a jema snapshot.

    Example:
      >>> import tempfile
      >>> print(snapshot_table(tempfile.mkdtemp()).splitlines()[-1])
      0 snapshots
    """
    snapshots = posthoc.list_snapshots(directory)
    lines = [f"{'step':>10}  {'sigma_rel':<16}{'stored as':<11}batch_stats"]
    for s in snapshots:
        widths = ", ".join(map(repr, s.sigma_rels))
        stored = s.dtype or "EMA dtype"
        lines.append(f"{s.step:>10}  {widths:<16}{stored:<11}{'yes' if s.batch_stats else 'no'}")
    lines.append(f"{len(snapshots)} snapshot{'' if len(snapshots) == 1 else 's'}")
    return "\n".join(lines)


def export(
    directory: str,
    width: float,
    out: str,
    *,
    step: int | None = None,
    torch_template: str | None = None,
    progress: bool = True,
) -> str:
    """Rebuild the EMA of ``width`` at ``step`` and write it with ``interop.save_checkpoint``.

    Args:
      directory: a snapshot folder.
      width: the σ_rel to rebuild.
      out: the file to write: ``.safetensors``, else a ``torch.save`` file (no PyTorch needed).
      step: the step to rebuild at, a snapshot's; None for the latest snapshot.
      torch_template: a ``.pth``/``.pt``/``.safetensors`` file whose state_dict (its
        ``ema_net``, else ``net``, else the bare dict) gives the names, order and buffers.
      progress: a progress bar over the snapshots (when tqdm is installed).

    Returns:
      A line saying what was written (an extrapolation warns, as ``reconstruct`` does).

    Raises:
      FileNotFoundError: when the folder or the template does not exist.
      ValueError: as :func:`jema.posthoc.reconstruct`, or mismatches against the template.
      OSError: when ``out`` cannot be written.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, jema
      >>> tx, folder = jema.power_ema((0.05, 0.1)), tempfile.mkdtemp()
      >>> _, state = tx.update({"w": jnp.zeros(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
      >>> _ = posthoc.save_snapshot(folder, state)
      >>> out = os.path.join(folder, "ema.safetensors")
      >>> export(folder, 0.07, out, progress=False).startswith("wrote ")
      True
    """
    import interop

    template = None if torch_template is None else _template(torch_template)
    snapshots = posthoc.list_snapshots(directory)
    if not snapshots:
        raise FileNotFoundError(f"no snapshot in {directory!r}")
    step = snapshots[-1].step if step is None else step
    parts = ["params"]
    if any(s.batch_stats for s in snapshots if s.step <= step):
        parts.append("batch_stats")
    variables = {  # reconstruct refuses a step with no snapshot: the label below is exact
        part: posthoc.reconstruct(directory, width, step=step, part=part, progress=progress)
        for part in parts
    }
    step = next(s.step for s in snapshots if s.step == step)
    interop.save_checkpoint(
        out,
        net=variables,
        ema_net=variables,
        torch_template=template,
        posthoc_sigma_rel=width,
        posthoc_step=step,
    )
    return f"wrote {out}: ema_net = EMA of sigma_rel {width!r} at step {step} (net too)"


def _template(path: str) -> Any:
    from interop._schema import pick_section, read_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no --torch-template file {path!r}")
    return dict(pick_section(read_checkpoint(path), "auto", path))

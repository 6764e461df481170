"""The DINO objective and its updates, each a pure function.

* :func:`dino_loss` -- cross-entropy between the sharpened, centred teacher and the student over view pairs.
* :func:`teacher_entropies` -- collapse diagnostics of the teacher's outputs.
* :func:`update_center` -- the running centre of the teacher logits.
* :func:`ema_update` -- the teacher as an exponential moving average of the student.

Layout: engine layer; imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dino_loss", "ema_update", "teacher_entropies", "update_center"]


def dino_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    num_global_views: int = 2,
) -> Tensor:
    """DINO cross-entropy between the sharpened, centred teacher and the student over pairs of views.

    With ``G`` teacher (global) views and ``V >= G`` student views of ``B`` images, the first ``G`` student
    views being the same global crops the teacher saw:
    ``P_t = softmax((t - c) / tau_t)``, ``log P_s = log_softmax(s / tau_s)`` and
    ``L = mean over pairs (g, v), v != g, of mean_b [ - sum_k P_t[g, b, k] log P_s[v, b, k] ]``.
    The teacher is detached (no gradient). Computed in float32.

    Args:
        student_out: ``[V B, K]`` student logits, view-major.
        teacher_out: ``[G B, K]`` teacher logits of the global views, view-major.
        center: ``[K]`` or ``[1, K]`` running centre of the teacher logits.
        student_temp: ``tau_s`` (DINO: 0.1).
        teacher_temp: ``tau_t`` (DINO: 0.04 to 0.07).
        num_global_views: ``G``; ``B`` is the teacher's rows divided by ``G``.

    Returns:
        Scalar loss.

    Example:
        >>> s, t = torch.zeros(6, 4), torch.zeros(4, 4)  # V = 3, G = 2, B = 2, K = 4: uniform distributions
        >>> round(float(dino_loss(s, t, torch.zeros(4), 0.1, 0.04)), 4)  # ln 4
        1.3863
    """
    if student_out.ndim != 2 or teacher_out.ndim != 2 or student_out.shape[1] != teacher_out.shape[1]:
        raise ValueError(
            f"student_out [V B, K] and teacher_out [G B, K] expected, got {tuple(student_out.shape)} and "
            f"{tuple(teacher_out.shape)}"
        )
    k = teacher_out.shape[1]
    num_global = int(num_global_views)
    if num_global < 1 or teacher_out.shape[0] % num_global:
        raise ValueError(f"teacher rows {teacher_out.shape[0]} are not {num_global_views} views of a batch")
    batch = teacher_out.shape[0] // num_global
    num_views = student_out.shape[0] // batch
    if student_out.shape[0] % batch or num_views < num_global:
        raise ValueError(
            f"student rows {student_out.shape[0]} are not >= {num_global} whole views of {batch} images"
        )
    t = F.softmax((teacher_out.detach().float() - center.float().reshape(1, k)) / teacher_temp, dim=-1)
    log_s = F.log_softmax(student_out.float() / student_temp, dim=-1)
    t = t.reshape(num_global, batch, k)
    log_s = log_s.reshape(num_views, batch, k)
    cross = -torch.einsum("gbk,vbk->gv", t, log_s) / batch  # [G, V] batch-mean cross-entropies
    keep = ~torch.eye(num_global, num_views, dtype=torch.bool, device=cross.device)
    num_pairs = num_global * num_views - num_global
    return (cross * keep).sum() / num_pairs


@torch.no_grad()
def teacher_entropies(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> tuple[float, float]:
    """Collapse diagnostics: mean entropy of the teacher's per-image distributions, and entropy of their mean.

    Uniform collapse: the first tends to ``ln K`` (every image gets the flat distribution). Collapse to one
    dimension: the second tends to 0 (every image gets the same peaked distribution). A healthy run has a
    low first value and a high second one. Reads values back to the host (call at log intervals only).

    Args:
        teacher_out: ``[M, K]`` teacher logits.
        center: ``[1, K]`` centre.
        teacher_temp: Teacher temperature.

    Returns:
        ``(mean per-image entropy, entropy of the batch-mean distribution)`` in nats.

    Example:
        >>> h, hm = teacher_entropies(torch.zeros(2, 4), torch.zeros(1, 4), 0.04)
        >>> round(h, 4), round(hm, 4)  # flat outputs: both ln 4
        (1.3863, 1.3863)
    """
    probs = F.softmax((teacher_out.float() - center.float().reshape(1, -1)) / teacher_temp, dim=-1)
    per_image = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean()
    mean = probs.mean(dim=0)
    of_mean = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    return float(per_image), float(of_mean)


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> Tensor:
    """New centre ``c <- m c + (1 - m) mean_rows(teacher_out)`` (float32, no gradient).

    Args:
        center: ``[1, K]`` (or ``[K]``) current centre.
        teacher_out: ``[M, K]`` teacher logits of the step.
        momentum: ``m`` (DINO: 0.9).

    Returns:
        The updated centre, shaped like ``center``.

    Example:
        >>> update_center(torch.zeros(1, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.9)
        tensor([[0.2000, 0.3000]])
    """
    batch_mean = teacher_out.float().mean(dim=0).reshape(center.shape)
    return center.float() * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place ``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter (same architecture).

    Args:
        teacher: Updated module.
        student: Source module (parameters in the same order).
        momentum: ``m``.

    Example:
        >>> t, s = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = t.weight.data.fill_(1.0), s.weight.data.fill_(3.0)
        >>> ema_update(t, s, 0.75); t.weight.item()
        1.5
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different numbers of parameters")
    t_data = [p.data for p in t_params]
    torch._foreach_mul_(t_data, momentum)
    torch._foreach_add_(t_data, [p.data for p in s_params], alpha=1.0 - momentum)

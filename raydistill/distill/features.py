"""Feature distillation terms: hints, attention transfer, peer feature alignment. Pure torch: no Ray, no config.

Students' features reach these functions already projected by their adapters (raydistill.models.adapters); the
target features are detached here.
"""
import torch
import torch.nn.functional as F

from raydistill.distill.losses import mse_to_target


def hint_loss(adapted_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNet's hint (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"):
    MSE(r(f_s), f_t) = mean over batch and elements of (r(f_s) - f_t)^2, r the student's adapter, f_t detached.

    The paper writes 1/2 ||.||^2 summed per sample; the mean (RepDistiller's HintLoss, mdistiller's FitNet) keeps
    hint_weight independent of the feature size: their weight 100 carries over, the paper's scale is C*H*W/2.
    """
    return mse_to_target(adapted_student, teacher_features)


AT_FORMS = ("code", "paper")


def attention_map(features: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention": the spatial attention of a map [B, C, H, W],
    Q = mean over channels of |f|^p, flattened per sample and L2-normalized: a = Q / ||Q||_2, shape [B, H*W].

    ``size``: resize Q to (H', W') before normalizing (adaptive average pooling to shrink, bilinear to grow), so
    maps of different spatial sizes can be compared; the channel counts never need to agree.
    """
    if features.dim() != 4:
        raise ValueError(f"attention transfer needs feature maps [B, C, H, W], got shape {tuple(features.shape)}")
    q = features.abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        if q.shape[-2] >= size[0] and q.shape[-1] >= size[1]:
            q = F.adaptive_avg_pool2d(q, size)
        else:
            q = F.interpolate(q, size=size, mode="bilinear", align_corners=False)
    return F.normalize(q.flatten(1), p=2, dim=1)


def pooled_to_smaller(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two maps [B, C, H, W] at one spatial size: the larger one average-pooled (adaptive) to the smaller's, before
    any attention map is taken (RepDistiller's and mdistiller's AT: they pool to (H, H), the same for square maps)."""
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0,
                            form: str = "code") -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) on one pair of feature maps [B, C, H, W]; the channel counts
    may differ, the teacher's map is detached; a = attention_map (p = 2; the codes below take f^p, not |f|^p: the
    same at p = 2).

    ``form="code"`` (the authors' released code, szagoruyko/attention-transfer ``utils.at_loss``; RepDistiller's
    ``Attention``; mdistiller's ``at_loss``): the mean over the batch AND the H*W positions of (a_s - a_t)^2, that is
    (1/(B*H*W)) sum_b ||a_s - a_t||_2^2, after the larger of the two maps is average-pooled to the smaller's size.
    Those codes weight the sum of this term over the layer pairs by beta = 1000: at_weight 1000 reproduces them.

    ``form="paper"`` (Eq. 2 as written): the mean over the batch of ||a_s - a_t||_2 (not squared), the student's
    attention map resized to the teacher's spatial size. The norm, not its square, and not divided by H*W: another
    function of the maps, which no weight turns into the authors' computation (docs/features.md).
    """
    teacher = teacher_features.detach()
    if form == "code":
        student, teacher = pooled_to_smaller(student_features, teacher)
        return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()
    if form == "paper":
        student = attention_map(student_features, p, size=tuple(teacher.shape[-2:]))
        return (student - attention_map(teacher, p)).norm(p=2, dim=1).mean()
    raise ValueError(f"attention transfer form {form!r}: one of {', '.join(AT_FORMS)}")


def peer_alignment_loss(adapted: list[torch.Tensor], peer_features: list[torch.Tensor]) -> torch.Tensor:
    """Peer feature alignment: mean over the other peers j of MSE(r_j(f_i), f_j), where r_j is peer i's adapter
    toward peer j's feature shape and f_j is detached (each peer aligns itself, as in DML each learns from the others).
    Zero for no other peer.
    """
    if len(adapted) != len(peer_features):
        raise ValueError(f"{len(adapted)} adapted features for {len(peer_features)} peers")
    if not adapted:
        return torch.zeros(())
    return torch.stack([hint_loss(a, f) for a, f in zip(adapted, peer_features)]).mean()

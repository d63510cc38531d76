"""Loss terms with their papers' formulas. Pure torch: no Ray, no config."""
import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":
    KD(z, t) = T^2 * KL(softmax(t/T) || softmax(z/T)), averaged over the batch; the target is detached.

    The T^2 factor keeps the gradient scale independent of T. With T = 1 this is DML's KL term (Zhang et al. 2018).
    """
    target = target_logits.detach()
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_target = F.log_softmax(target / temperature, dim=1)
    kl = (log_p_target.exp() * (log_p_target - log_p_student)).sum(dim=1)
    return kl.mean() * temperature ** 2


def mse_to_target(predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Regression distillation: mean squared error toward the (detached) target predictions."""
    return F.mse_loss(predictions, target.detach())


def task_loss(outputs: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression."""
    if task == "regression":
        return F.mse_loss(outputs.reshape(labels.shape[0], -1), labels.reshape(labels.shape[0], -1).float())
    return F.cross_entropy(outputs, labels)


def pairwise_kl(logits: torch.Tensor) -> torch.Tensor:
    """Consistency of peers: mean over ordered pairs (i != j) of KL(softmax(z_j) || softmax(z_i)), batch-mean.
    logits: [P, B, C]. Returns 0 for a single peer."""
    peers = logits.shape[0]
    if peers < 2:
        return logits.new_zeros(())
    log_p = F.log_softmax(logits.float(), dim=-1)                       # [P, B, C]
    # kl[i, j] = sum_c p_j (log p_j - log p_i), averaged over the batch
    cross = torch.einsum("jbc,ibc->ijb", log_p.exp(), log_p)             # sum_c p_j log p_i
    self_term = (log_p.exp() * log_p).sum(-1)                            # [P, B]: sum_c p_j log p_j
    kl = self_term.unsqueeze(0) - cross                                  # [i, j, B]
    off_diagonal = ~torch.eye(peers, dtype=torch.bool)
    return kl.mean(-1)[off_diagonal].mean()

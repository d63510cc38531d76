"""The names that cross layers, defined once: what a member's outputs and a peer's targets hold, and what a run's
models are called (in records, TensorBoard, summary.json, the export and control requests)."""
from __future__ import annotations

# ---- a step's outputs (what a member sends) and targets (what a peer's loss reads) ---------------------------------
LOGITS = "logits"                  # a member's logits on its view of the step's batch
EMA_LOGITS = "ema_logits"          # a peer's temporal-mean (EMA) teacher's logits
HINT = "hint"                      # a member's feature map at its hint layer (fitnet, feature alignment)
FEATURES = "features"              # a peer's pooled features (the learned ensemble head reads them)
ADAPTED_HINT = "adapted_hint"      # a student's hint through its adapter toward the teacher(s)
ALIGNED_HINTS = "aligned_hints"    # a peer's hint through its adapters toward the other peers
PEER_WEIGHTS = "peer_weights"      # performance-based weights of the other peers (method.peer_weighting)

# ---- a run's models -------------------------------------------------------------------------------------------------
PEER, EMA_TEACHER, TEACHER, ENSEMBLE = "peer", "ema_teacher", "teacher", "ensemble"    # kinds of model


def peer_name(ident: int) -> str:
    """A peer's stable name: peer<id> (its number, never reused in a run)."""
    return f"{PEER}{ident}"


def ema_name(ident: int) -> str:
    """The name of a peer's EMA teacher: peer<id>_ema."""
    return f"{peer_name(ident)}_ema"


def teacher_name(index: int) -> str:
    return f"{TEACHER}{index}"


def peer_id(name: str) -> int:
    """peer<id> -> id (ValueError for another name)."""
    if not name.startswith(PEER) or not name[len(PEER):].isdigit():
        raise ValueError(f"not a peer's name: {name!r}")
    return int(name[len(PEER):])


def model_name(kind: str, index: int) -> str:
    """A model's name by its kind: peer<i>, peer<i>_ema, teacher<j>, ensemble."""
    if kind == ENSEMBLE:
        return ENSEMBLE
    if kind == EMA_TEACHER:
        return ema_name(index)
    return teacher_name(index) if kind == TEACHER else peer_name(index)

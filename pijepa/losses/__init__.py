"""JEPA losses: I-JEPA's smooth-L1 regression, PKT, and their combinations (see ``registry``)."""

from pijepa.losses.pkt import GROUPINGS, pkt_loss
from pijepa.losses.registry import LOSS_NAMES, JepaLoss, build_loss

__all__ = ["GROUPINGS", "LOSS_NAMES", "JepaLoss", "build_loss", "pkt_loss"]

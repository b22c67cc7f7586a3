"""The public fused ops (torch.library custom ops with fake implementations) and their backends."""

from .update import *  # noqa: F401,F403

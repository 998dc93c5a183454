"""Checkpoint-exact PyTorch OFA and SegOFA (IFSeg)."""

from .config import MODEL_REGISTRY, OFAConfig, get_config
from .encoder import EncoderOutput, OFAEncoder
from .decoder import OFADecoder
from .ofa import OFA, SegConstants, SegOFA, SegTableCache, SegTables, build_model, count_parameters, init_weights

__all__ = ["MODEL_REGISTRY", "OFAConfig", "get_config", "EncoderOutput", "OFAEncoder", "OFADecoder", "OFA", "SegOFA",
           "SegConstants", "SegTables", "SegTableCache",
           "build_model", "count_parameters", "init_weights"]

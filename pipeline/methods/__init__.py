"""Methods by name. Adding one: a module here with a `Method` subclass, and a line below."""

from pipeline.config import Config
from pipeline.methods.base import Method
from pipeline.methods.metaug import MetAug
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.mocov3 import MoCoV3
from pipeline.methods.sdclr import SDCLR
from pipeline.methods.sdmp import SDMPMoCoV3, SDMPSimCLR
from pipeline.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "sdmp_mocov3": SDMPMoCoV3,
    "sdmp_simclr": SDMPSimCLR,
    "sdclr": SDCLR,
    "metaug": MetAug,
}


def build_method(cfg: Config) -> Method:
    return METHODS[cfg.method.name](cfg)

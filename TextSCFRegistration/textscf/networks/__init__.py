"""Network modules: LKU-Net feature branch, textSCF heads and the full TextSCFNet."""
from textscf.networks.heads import ReferenceSCFHead, TextSCFHead  # noqa: F401
from textscf.networks.lkunet import LKUNet  # noqa: F401
from textscf.networks.textscf_net import RegistrationOutput, TextSCFConfig, TextSCFNet  # noqa: F401

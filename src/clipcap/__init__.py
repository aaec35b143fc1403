"""ClipCap: CLIP prefix for image captioning (Mokady, Hertz, Bermano 2021), HF-native."""

from .captioner import Captioner
from .config import ClipCapConfig
from .errors import ClipCapError
from .model import ClipCapModel
from .version import __version__

__all__ = ["ClipCapConfig", "ClipCapError", "ClipCapModel", "Captioner", "__version__"]

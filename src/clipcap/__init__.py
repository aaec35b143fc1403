"""ClipCap: CLIP prefix for image captioning (Mokady, Hertz, Bermano 2021), HF-native."""

from .captioner import Captioner
from .config import ClipCapConfig
from .errors import ClipCapError
from .model import ClipCapModel

__version__ = "0.1.0"

__all__ = ["ClipCapConfig", "ClipCapError", "ClipCapModel", "Captioner", "__version__"]

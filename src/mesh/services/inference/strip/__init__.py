"""The lateral-flow strip reader (pure NumPy/OpenCV), its synthetic data generator and its evaluation."""

from mesh.services.inference.strip.config import ReaderConfig
from mesh.services.inference.strip.reader import StripReader
from mesh.services.inference.strip.types import LineReading, QualityFlag, StripReading, Verdict, Window

__all__ = ["LineReading", "QualityFlag", "ReaderConfig", "StripReader", "StripReading", "Verdict", "Window"]

"""StreamAdapter (Muhtar et al., arXiv 2411.09289): a stream of context chunks absorbed into one fixed-size
low-rank weight update. Importing this package registers the method with ``AutoModelForContextAdaptation``."""

from ...modeling_utils import register_method
from .configuration_stream_adapter import StreamAdapterConfig
from .modeling_stream_adapter import AdapterStream, StreamAdapterLayout, StreamAdapterModel

register_method(StreamAdapterConfig, StreamAdapterModel, exist_ok=True)

__all__ = ["AdapterStream", "StreamAdapterConfig", "StreamAdapterLayout", "StreamAdapterModel"]

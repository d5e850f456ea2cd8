"""One module per mechanism, named after the model. Importing this package registers them all."""

from . import vanilla  # noqa: F401
from . import linear_transformer  # noqa: F401
from . import performer  # noqa: F401
from . import linformer  # noqa: F401
from . import synthesizer  # noqa: F401
from . import longformer  # noqa: F401
from . import bigbird  # noqa: F401
from . import image_transformer  # noqa: F401
from . import sparse_transformer  # noqa: F401
from . import axial  # noqa: F401
from . import memory_compressed  # noqa: F401
from . import reformer  # noqa: F401
from . import set_transformer  # noqa: F401
from . import sinkhorn  # noqa: F401
from . import routing  # noqa: F401
from . import transformer_xl  # noqa: F401
from . import etc  # noqa: F401
from . import compressive  # noqa: F401

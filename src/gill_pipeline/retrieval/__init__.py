"""Retrieval for GILL: an index of image embeddings in the retrieval space, its search, and building it.

- `index.py`: [`RetrievalIndex`], rows + records, search (`search.py`: exact or FAISS), loading the best images
  (`image_loading.py`), the weights check (`fingerprint.py`).
- `faiss_shards.py`: FAISS indexes saved with a set, read back memory-mapped, in one file or several (shards merged);
  `faiss_params.py`: choosing one by measured recall ([`choose_faiss_params`], `use_faiss("auto")`);
  `faiss_build.py`: [`add_faiss_index`], indexing a saved set of any size streamed from its shards.
- `serialization.py`: the folder format, `save_pretrained` / `from_pretrained` / `push_to_hub` of a set;
  `record_table.py`: its records, read by byte offset from the saved JSON Lines files (`index.records`).
- `calibration.py`: the similarity floor (`min_similarity`) and `calibrate_min_similarity`.
- `build.py` + `sources.py`: embedding a folder, a caption TSV or webdataset shards into an index.
"""

from .build import build_retrieval_index, embed_images
from .fingerprint import IndexWeightsMismatchError, probe_embeddings, weights_fingerprint
from .image_loading import ImageLoadError, UnsafeImagePathError, load_record_image, resolve_local_path
from .calibration import calibrate_min_similarity
from .index import RETRIEVAL_ID_INFO_KEY, RetrievalIndex, RetrievedImage
from .faiss_build import add_faiss_index
from .faiss_params import FaissParams, choose_faiss_params, measure_recall, tune_and_measure_recall, tune_search_params
from .faiss_shards import FaissSettings, ShardedFaissSearcher, read_faiss_files
from .search import ExactSearcher, FaissSearcher, SearchResult
from .serialization import RetrievalIndexError
from .sources import CaptionTSVSource, ImageFolderSource, WebDatasetSource, as_source

__all__ = [
    "RetrievalIndex",
    "RetrievedImage",
    "RetrievalIndexError",
    "IndexWeightsMismatchError",
    "ImageLoadError",
    "UnsafeImagePathError",
    "build_retrieval_index",
    "calibrate_min_similarity",
    "embed_images",
    "ExactSearcher",
    "FaissSearcher",
    "ShardedFaissSearcher",
    "FaissSettings",
    "FaissParams",
    "choose_faiss_params",
    "measure_recall",
    "tune_and_measure_recall",
    "tune_search_params",
    "add_faiss_index",
    "read_faiss_files",
    "SearchResult",
    "ImageFolderSource",
    "CaptionTSVSource",
    "WebDatasetSource",
    "as_source",
    "load_record_image",
    "resolve_local_path",
    "weights_fingerprint",
    "probe_embeddings",
    "RETRIEVAL_ID_INFO_KEY",
]

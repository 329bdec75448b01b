"""Retrieval for GILL: an index of image embeddings in the retrieval space, its search, and building it."""

from .build import build_retrieval_index, embed_images
from .fingerprint import IndexWeightsMismatchError, probe_embeddings, weights_fingerprint
from .image_loading import ImageLoadError, UnsafeImagePathError, load_record_image, resolve_local_path
from .index import (
    RETRIEVAL_ID_INFO_KEY,
    RetrievalIndex,
    RetrievalIndexError,
    RetrievedImage,
    calibrate_min_similarity,
)
from .search import ExactSearcher, FaissSearcher, SearchResult
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

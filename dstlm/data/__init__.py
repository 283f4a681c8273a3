from dstlm.data.packing import BlockDataset, build_packed, load_documents, pack
from dstlm.data.sampler import ResumableBatchSampler
from dstlm.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = ["BlockDataset", "ResumableBatchSampler", "TextTokenizer", "build_packed", "load_documents",
           "load_tokenizer", "pack"]

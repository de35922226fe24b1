import sys, time
from fused_concept.training import recipes
from fused_concept.training.config import TrainConfig
from fused_concept.training.sweep import summarize
from fused_concept.integrations.hf.models import load_default_tokenizer
seeds=[int(x) for x in sys.argv[2].split(",")]
config = recipes.apply(TrainConfig, "medium", concept_cache="runs/medium-cache", load_in_4bit=False)
t=time.time()
summarize(config, [0.0, 0.25, 0.5], sys.argv[1], seeds=seeds, tokenizer=load_default_tokenizer())
print(f"summarized in {time.time()-t:.1f} s")

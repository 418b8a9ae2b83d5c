"""hetjax: training and serving LLMs on heterogeneous GPUs and networks."""

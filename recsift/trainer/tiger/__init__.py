"""TIGER, the generative-retrieval backend (Rajput et al., "Recommender Systems with Generative Retrieval",
NeurIPS 2023): items become semantic ID tuples (:mod:`recsift.trainer.tiger.rqvae`)."""

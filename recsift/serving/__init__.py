"""``recsift serve``: recommendations over HTTP from the base model + the serving adapter (see ``app``)."""

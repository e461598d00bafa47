"""Running the data tools beyond one machine: deterministic shards, and a Ray runner that fans them out."""

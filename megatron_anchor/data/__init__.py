"""Token + role-channel datasets: writing, merging, validating and reading them."""

"""Test beds and fault tools shared by tests/ and bench/; not part of the product."""

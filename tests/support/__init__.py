"""Test-only helpers shared by the unit, e2e and VM tests (devices, a test server)."""

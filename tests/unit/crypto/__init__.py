"""Tests of secure_split.crypto."""

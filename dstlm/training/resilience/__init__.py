"""Staying alive and honest: preemption, dead ranks, non-finite numbers, and hook points for plug-ins."""

//! The planner: memory budget and device profile to cache sizes, hot neurons and threads. In progress.

//! Storage I/O for pinion: read-only file mapping, 4 KiB-aligned buffers, and page-cache-bypassing reads of
//! byte ranges (io_uring, with a pread thread pool as fallback).
//!
//! This crate knows nothing about models: it moves bytes from files into memory and counts what it did. All of
//! pinion's file-related `unsafe` code lives here, each block with a `// SAFETY:` comment. The main types are
//! [`MappedFile`] and, for flash reads, the reader built in later modules.

mod mmap;

pub use crate::mmap::MappedFile;

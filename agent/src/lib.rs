//! imageupd library

//! The client side end to end.

//! Clay shell: the intent bar of Kiln's Clay desktop guest. The user types
//! what they want; a rule-based parser ([`intent`]) maps it to an action
//! ([`actions`]); the results surface shows what happened. The UI is a
//! Wayland client drawing in software ([`render`], [`app`]), so it runs on a
//! virtio-gpu display without 3D acceleration.

pub mod actions;
pub mod app;
pub mod intent;
pub mod llm;
pub mod render;
pub mod shell;

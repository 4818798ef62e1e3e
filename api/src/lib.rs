//! `api`: the app's side of monohook. It answers whether an account needs re-authorisation and hands
//! out a re-auth token that works now, fetching a fresh one from Mono when the stored one is about to
//! expire, or a hosted re-auth link (Mono's v2 flow). It shares PostgreSQL with the worker and never touches RabbitMQ.

pub mod auth;
pub mod caller;
pub mod config;
pub mod db;
pub mod errors;
pub mod flights;
pub mod links;
pub mod locks;
pub mod mono_access;
pub mod recorder;
pub mod redirects;
pub mod refresh;
pub mod refusals;
pub mod routes;
pub mod startup;
pub mod state;

//! The `conveyor` binary: the library's [`conveyor::App`] with nothing added — the built-in
//! applications, the whole command line and the dashboard.

fn main() -> std::process::ExitCode {
    conveyor::App::new().run()
}

//! Frame times over the last second, for the status bar: the check that the UI never stalls while a run trains.
//!
//! A frame's time is eframe's CPU time for it (`frame.info().cpu_usage`: the app's update, tessellation and
//! painting, without waiting for vsync); where eframe reports none (the test harness) it is the app's own update
//! time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window the statistics cover.
pub const FRAME_WINDOW: Duration = Duration::from_secs(1);

/// Frame durations of the last [`FRAME_WINDOW`].
#[derive(Clone, Debug, Default)]
pub struct FrameTimes {
    frames: VecDeque<(Instant, Duration)>,
}

/// Mean and worst frame time over the window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameStats {
    /// Frames in the window.
    pub frames: usize,
    /// Mean frame time.
    pub mean: Duration,
    /// Longest frame.
    pub worst: Duration,
}

impl FrameTimes {
    /// Records a frame that ended at `now` and took `duration`, and forgets frames older than the window.
    pub fn push(&mut self, now: Instant, duration: Duration) {
        self.frames.push_back((now, duration));
        while let Some(&(at, _)) = self.frames.front() {
            if now.duration_since(at) > FRAME_WINDOW {
                self.frames.pop_front();
            } else {
                break;
            }
        }
    }

    /// Mean and worst over the window (None before the first frame).
    pub fn stats(&self) -> Option<FrameStats> {
        let n = self.frames.len();
        if n == 0 {
            return None;
        }
        let total: Duration = self.frames.iter().map(|(_, d)| *d).sum();
        let worst = self.frames.iter().map(|(_, d)| *d).max().unwrap_or_default();
        Some(FrameStats {
            frames: n,
            mean: total / n as u32,
            worst,
        })
    }
}

impl std::fmt::Display for FrameStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "frame {:.1} ms mean, {:.1} ms worst ({} frames in 1 s)",
            ms(self.mean),
            ms(self.worst),
            self.frames
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_worst_cover_the_last_second_only() {
        let start = Instant::now();
        let mut times = FrameTimes::default();
        assert_eq!(times.stats(), None);
        let ms = Duration::from_millis;
        times.push(start, ms(40));
        times.push(start + ms(500), ms(2));
        times.push(start + ms(900), ms(4));
        let s = times.stats().expect("frames");
        assert_eq!((s.frames, s.mean, s.worst), (3, ms(46) / 3, ms(40)));
        // 1.2 s after the first frame it has left the window: the 40 ms stall no longer counts.
        times.push(start + ms(1200), ms(6));
        let s = times.stats().expect("frames");
        assert_eq!((s.frames, s.mean, s.worst), (3, ms(4), ms(6)));
        assert_eq!(s.to_string(), "frame 4.0 ms mean, 6.0 ms worst (3 frames in 1 s)");
    }
}

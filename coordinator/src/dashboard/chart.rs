//! Line charts as inline SVG, drawn on the server: no chart library, no build step. Every
//! point is a `<circle class="point">` with its values in `data-x`/`data-y` and a `<title>`
//! (the browser's tooltip), so that a page's charts can be read, and counted, from its DOM.

use std::fmt::Write as _;

use super::pages::escape;

/// Width and height of a chart, in SVG units.
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 240.0;
/// Room for the axis labels.
const MARGIN: f64 = 48.0;
/// Colours of the series, in order.
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// One line of a chart.
pub struct Series<'a> {
    /// Its name, in the legend.
    pub name: &'a str,
    /// Its points, `(x, y)`, in x order; points that are not finite are left out.
    pub points: Vec<(f64, f64)>,
}

/// A chart titled `title` of `series` over x values named `x_label`, with `id` as its element
/// id. Says so in text when there is nothing to draw.
pub fn line_chart(id: &str, title: &str, x_label: &str, series: &[Series<'_>]) -> String {
    let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|series| series.points.iter().copied().filter(finite))
        .collect();
    let mut html = format!(
        "<figure class=\"chart\" id=\"{}\"><figcaption>{}</figcaption>",
        escape(id),
        escape(title)
    );
    if all.is_empty() {
        html.push_str("<p class=\"empty\">no points yet</p></figure>");
        return html;
    }
    let bounds = |values: &mut dyn Iterator<Item = f64>| {
        let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), v| {
            (low.min(v), high.max(v))
        });
        if (high - low).abs() < f64::EPSILON {
            (low - 0.5, high + 0.5)
        } else {
            (low, high)
        }
    };
    let (x_low, x_high) = bounds(&mut all.iter().map(|point| point.0));
    let (y_low, y_high) = bounds(&mut all.iter().map(|point| point.1));
    let to_x = |x: f64| MARGIN + (x - x_low) / (x_high - x_low) * (WIDTH - 2.0 * MARGIN);
    let to_y = |y: f64| HEIGHT - MARGIN - (y - y_low) / (y_high - y_low) * (HEIGHT - 2.0 * MARGIN);
    let _ = write!(
        html,
        "<svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         role=\"img\" aria-label=\"{}\">\
         <line class=\"axis\" x1=\"{MARGIN}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\"/>\
         <line class=\"axis\" x1=\"{MARGIN}\" y1=\"{MARGIN}\" x2=\"{MARGIN}\" y2=\"{bottom}\"/>\
         <text x=\"{MARGIN}\" y=\"{label_y}\">{}</text>\
         <text x=\"{right}\" y=\"{label_y}\" text-anchor=\"end\">{} {}</text>\
         <text x=\"4\" y=\"{MARGIN}\">{}</text><text x=\"4\" y=\"{bottom}\">{}</text>",
        escape(title),
        number(x_low),
        number(x_high),
        escape(x_label),
        number(y_high),
        number(y_low),
        bottom = HEIGHT - MARGIN,
        right = WIDTH - MARGIN,
        label_y = HEIGHT - MARGIN + 18.0,
    );
    for (index, series) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points: Vec<(f64, f64)> = series.points.iter().copied().filter(finite).collect();
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", to_x(x), to_y(y)))
            .collect();
        let _ = write!(
            html,
            "<g class=\"series\" data-series=\"{}\"><polyline fill=\"none\" stroke=\"{colour}\" \
             stroke-width=\"1.5\" points=\"{}\"/>",
            escape(series.name),
            path.join(" ")
        );
        for &(x, y) in &points {
            let _ = write!(
                html,
                "<circle class=\"point\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{colour}\" \
                 data-x=\"{x}\" data-y=\"{y}\"><title>{}: {} at {} {}</title></circle>",
                to_x(x),
                to_y(y),
                escape(series.name),
                number(y),
                escape(x_label),
                number(x)
            );
        }
        html.push_str("</g>");
    }
    html.push_str("</svg><p class=\"legend\">");
    for (index, series) in series.iter().enumerate() {
        let _ = write!(
            html,
            "<span style=\"color:{}\">&#9632; {}</span> ",
            COLOURS[index % COLOURS.len()],
            escape(series.name)
        );
    }
    html.push_str("</p></figure>");
    html
}

/// A value for an axis or a tooltip: four significant digits.
fn number(value: f64) -> String {
    if value != 0.0 && (value.abs() >= 1e5 || value.abs() < 1e-3) {
        format!("{value:.3e}")
    } else {
        let text = format!("{value:.4}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        if text.is_empty() || text == "-" {
            "0".to_owned()
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_point_is_a_circle_and_names_are_escaped() {
        let chart = line_chart(
            "loss",
            "loss <rank 0>",
            "step",
            &[
                Series {
                    name: "rank \"0\"",
                    points: vec![(1.0, 2.3), (2.0, f64::NAN), (3.0, 1.1)],
                },
                Series {
                    name: "eval",
                    points: vec![(3.0, 0.9)],
                },
            ],
        );
        assert_eq!(chart.matches("<circle class=\"point\"").count(), 3);
        assert!(chart.contains("loss &lt;rank 0&gt;"), "{chart}");
        assert!(
            chart.contains("data-series=\"rank &quot;0&quot;\""),
            "{chart}"
        );
        assert!(!chart.contains("<rank"), "{chart}");
        assert!(chart.contains("data-x=\"3\" data-y=\"1.1\""), "{chart}");
    }

    #[test]
    fn an_empty_chart_says_so_and_one_value_still_draws() {
        assert!(line_chart("c", "t", "step", &[]).contains("no points yet"));
        let single = line_chart(
            "c",
            "t",
            "step",
            &[Series {
                name: "s",
                points: vec![(5.0, 5.0)],
            }],
        );
        assert_eq!(single.matches("<circle").count(), 1);
        assert!(!single.contains("NaN"), "{single}");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(1170.0), "1170");
        assert_eq!(number(123_456.0), "1.235e5");
        assert_eq!(number(0.0001), "1.000e-4");
    }
}

"""What test.py shows and draws: the per-class table and the confusion-matrix picture."""
import cv2
import numpy as np


def class_table(names, columns):
    """Aligned per-class lines: the class name, then one column per (title, values); 'n/a' where undefined."""
    width = max(len("class"), *(len(n) for n in names))

    def cell(value):
        if value is None:
            return f"{'n/a':>9}"
        return f"{value:9d}" if isinstance(value, int) else f"{value:9.4f}"

    lines = [f"  {'class':<{width}}" + "".join(f"  {title:>9}" for title, _ in columns)]
    for i, name in enumerate(names):
        lines.append(f"  {name:<{width}}" + "".join(f"  {cell(values[i])}" for _, values in columns))
    return lines


def draw_confusion(confusion, names):
    """Row-normalised confusion matrix as a BGR image: rows are the true class, columns the prediction."""
    k = len(names)
    cell = max(14, min(56, 900 // max(k, 1)))
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    label_w = max(cv2.getTextSize(n, font, scale, thick)[0][0] for n in names) + 12
    title_h = 28
    top, left = title_h + label_w, title_h + label_w
    image = np.full((top + k * cell + 8, left + k * cell + 8, 3), 255, np.uint8)

    rows = confusion.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(rows > 0, confusion / np.maximum(rows, 1), np.nan)
    colours = cv2.applyColorMap(np.nan_to_num(share * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    for i in range(k):
        for j in range(k):
            y, x = top + i * cell, left + j * cell
            colour = (200, 200, 200) if np.isnan(share[i, j]) else tuple(int(c) for c in colours[i, j])
            cv2.rectangle(image, (x, y), (x + cell - 1, y + cell - 1), colour, -1)
            if cell >= 36 and not np.isnan(share[i, j]):
                text = f"{share[i, j]:.2f}"
                (tw, th), _ = cv2.getTextSize(text, font, 0.4, 1)
                ink = (0, 0, 0) if share[i, j] > 0.6 else (255, 255, 255)  # viridis is light at the top
                cv2.putText(image, text, (x + (cell - tw) // 2, y + (cell + th) // 2), font, 0.4, ink, 1,
                            cv2.LINE_AA)

    for i, name in enumerate(names):  # true classes down the left side
        (tw, th), _ = cv2.getTextSize(name, font, scale, thick)
        cv2.putText(image, name, (left - tw - 6, top + i * cell + (cell + th) // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    # Predicted classes along the top: draw the names on a horizontal strip, then turn it upright.
    strip = np.full((k * cell, label_w, 3), 255, np.uint8)
    for j, name in enumerate(names):
        th = cv2.getTextSize(name, font, scale, thick)[0][1]
        cv2.putText(strip, name, (6, j * cell + (cell + th) // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    image[title_h:top, left:left + k * cell] = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    centre = (k * cell - cv2.getTextSize("predicted", font, 0.55, 1)[0][0]) // 2
    cv2.putText(image, "predicted", (left + max(centre, 0), title_h - 9), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    axis = np.full((title_h, k * cell, 3), 255, np.uint8)
    centre = (k * cell - cv2.getTextSize("true", font, 0.55, 1)[0][0]) // 2
    cv2.putText(axis, "true", (max(centre, 0), title_h - 9), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    image[top:top + k * cell, :title_h] = cv2.rotate(axis, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image
